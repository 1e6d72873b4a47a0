"""The methods catalog: methods, algorithms and their parameter JSON Schemas."""
