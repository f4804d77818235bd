"""Library code of the Deep Ranking pipeline: one module per concept.

The programs at the repository root (``train_net.py``, ``gen_embeddings.py``, ...)
and the model module ``deep_rank_net.py`` import from here; nothing in this
package imports a program or ``deep_rank_net``. See DESIGN.md for the map.
"""
