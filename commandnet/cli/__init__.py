"""The ``commandnet`` command line (click); each command lives in a module of its own."""
