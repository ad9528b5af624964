"""Getting models onto hardware: the device bundle, named boards and deployment to them over SSH."""
