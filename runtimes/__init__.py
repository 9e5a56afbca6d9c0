"""Control plane: model catalog, engines, backends, runtime registry and policy.

No Flask and no Celery here: the web app and the tasks call in, never the other way round.
"""
