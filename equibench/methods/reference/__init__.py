"""Methods that wrap a reference library's own implementation (frame-averaging-pytorch, ...),
each cross-checked against equibench's implementation of the same method. One registered name per
module; the libraries are optional (``pip install -e .[reference]``): without one, its method
is listed as unavailable with the reason."""
