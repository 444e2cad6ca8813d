"""Backends behind the client: hosted HTTP (``http``), Amazon Bedrock (``bedrock``), local weights (``local``)."""
