"""Training programs, apart from the runtime: the bundled U-Net (:mod:`.train_unet`) and the
bundled classifier (:mod:`.train_classifier`).  On the command line: ``diffsampler train model``
and ``diffsampler train classifier`` (each resumable or quick; see their ``--help``)."""
