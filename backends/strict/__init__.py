"""The array_api_strict backend (``adapter.py``): the standard and nothing else, with extra devices."""
