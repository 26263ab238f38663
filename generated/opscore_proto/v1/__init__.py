"""Generated from protos/opscore/v1. Do not edit."""
