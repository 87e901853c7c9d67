"""The configs shipped with pixelgen: `--config configs/<name>.py[:variant]`. They are also
installed as the package pixelgen.configs, so that a non-editable install finds them by the
same name from any directory."""
