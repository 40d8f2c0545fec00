# Makes includes/ a package for cimport. Its .pxd files declare the C APIs the core calls; they
# hold declarations only (no code), so nothing of them exists at run time.
