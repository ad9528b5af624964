"""Getting models onto hardware: the device bundle and deployment to boards over SSH."""
