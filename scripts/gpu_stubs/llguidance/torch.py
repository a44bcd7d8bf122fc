from llguidance import __getattr__  # noqa: F401  (the package's stand-in names)
