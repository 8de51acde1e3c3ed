"""AutoRule's method as a library the book's chapters call: one subpackage per part of the method, a few
base modules (configuration, artifacts, caching) under them, and the book and the smoke models outside
the method path (README, Layout)."""
