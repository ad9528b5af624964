"""Getting models onto hardware: the device bundle and the microcontroller export."""
