"""WSGI entry point for gunicorn: `gunicorn -c webapp/gunicorn_conf.py webapp.wsgi:app`.

The services are built once per worker, with the Celery app that sends their tasks (this
process runs none).
"""

from config.settings import load_settings
from services import build_services
from tasks.celery_app import make_celery
from tasks.queue import CeleryQueue
from webapp import create_app

settings = load_settings()
celery_app = make_celery(settings)
app = create_app(build_services(settings, CeleryQueue()),
                 celery_app.conf.broker_transport_options)
