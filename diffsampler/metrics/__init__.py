"""Sample-quality metrics: FID, KID and precision/recall on torch-fidelity, and the bundled classifier.

The names of the feature extractors live here so that importing them costs nothing; the
extractors themselves (:mod:`.extractors`) load torch-fidelity on first use.
"""
INCEPTION = "inception-v3-compat"
CLASSIFIER = "fashion-mnist-classifier"
FEATURE_LAYERS = {INCEPTION: "2048", CLASSIFIER: "features"}
