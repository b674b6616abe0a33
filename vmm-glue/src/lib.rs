//! spindrift vmm-glue: not yet implemented (see the issue tracker).
