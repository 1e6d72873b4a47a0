"""One module per method, each defining `METHOD` (its algorithms and their parameter models); torch-free."""
