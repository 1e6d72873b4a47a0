"""The web dashboard at /ui: pages, their partials and static files (see router.py)."""
