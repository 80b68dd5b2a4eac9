"""The package's defaults, in one place (no imports: the CLI reads them before loading torch).

How each was chosen is in README.md ("Defaults").
"""
DEFAULT_MODEL = "fashion-mnist"    # the bundled class-conditional U-Net
DEFAULT_SOLVER = "unipc"           # what sample() and the CLI use without --solver
# Every solver's default grid (a solver may name its own): time-quadratic, uniform in sqrt(VP time).
DEFAULT_SCHEDULE, DEFAULT_SCHEDULE_OPTIONS = "time_uniform", {"rho": 2.0}
DEFAULT_NFE = 10                   # the CLI's NFE when nothing else fixes the grid
