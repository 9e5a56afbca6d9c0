"""Configuration: settings from the environment, example keys and the model catalog."""
