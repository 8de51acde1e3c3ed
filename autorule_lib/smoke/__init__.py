"""The smoke profile's tiny models, built locally so the whole book runs on a CPU with no download.

A fixture builder outside the method path: only entry points import it (see ``build``).
"""
