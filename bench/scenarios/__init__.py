"""One module per scenario; each takes the run's ``Harness`` and fills its results.

``bench.run`` calls them in this order: ``baseline`` (bare Sanic: live, paced, flush,
storm, memory), ``kafka_floor`` (paced), ``fanout`` (live, paced, storm, memory),
``storm`` (JWT-local storm), ``store`` (store, flush), ``scale`` (scale-out through
Redis, and Redis alone in ``redis_capacity``). ``flush`` is the flush probe both the
baseline and the store use.
"""
