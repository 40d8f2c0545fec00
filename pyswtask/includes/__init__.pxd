# Makes includes/ a package for cimport. Its .pxd files declare the C APIs the core calls; they
# hold declarations and inline helpers only, compiled into the module that cimports them, so
# no module of theirs exists at run time.
