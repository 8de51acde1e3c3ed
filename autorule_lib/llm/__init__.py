"""Calling LLMs (API, local, replayed) behind one small client interface, cached and retried."""
