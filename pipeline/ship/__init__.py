"""Getting models onto hardware: the device bundle and its kin."""
