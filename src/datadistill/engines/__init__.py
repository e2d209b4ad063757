"""Labeling engines other than the local one (:func:`datadistill.label.label` with ``engine="local"``).

Each writes the local engine's shards and is imported only when asked for, so that its dependencies stay
optional: :mod:`datadistill.engines.ray` needs ``pip install 'datadistill[ray]'``.
"""
