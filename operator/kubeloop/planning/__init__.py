"""Pure planning: decisions as functions of (spec, observed world, clock). No I/O here."""
