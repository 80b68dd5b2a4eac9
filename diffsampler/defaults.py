"""The package's defaults, in one place (no imports: the CLI reads them before loading torch).

How each was chosen is in README.md ("Defaults").
"""
DEFAULT_MODEL = "fashion-mnist"    # the bundled class-conditional U-Net
DEFAULT_SOLVER = "ipndm"           # what sample() and the CLI use without --solver
DEFAULT_NFE = 10                   # the CLI's NFE when nothing else fixes the grid
