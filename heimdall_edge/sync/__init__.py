"""Store and forward: captures from the spool to S3 and DynamoDB, with the device's credentials."""
