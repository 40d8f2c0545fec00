# The compiled core's shape, declared the way uvloop's loop.pxd declares its handles: each
# core/*.pyx has a .pxd beside it with its cdef classes' fields and C methods and the C
# functions other core files call, and all of them are included here, so no file of the core
# depends on the order in which _core.pyx includes the implementations. C APIs are cimported
# from includes/*.pxd (and Cython's own libc and posix declarations) by the file that calls them.
# A .pxd can only use what an earlier one declared, hence the order below.

cimport cython

include "core/frame.pxd"
include "core/unpack.pxd"
include "core/pack.pxd"
include "core/arena.pxd"
include "core/channel.pxd"
include "core/msgqueue.pxd"
include "core/state.pxd"
include "core/dispatcher.pxd"
include "core/taskloop.pxd"
include "core/mailbox.pxd"
include "core/reply.pxd"
include "core/crontable.pxd"
include "core/table.pxd"
