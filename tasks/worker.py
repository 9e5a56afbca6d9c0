"""Entry point of the Celery worker, beat and Flower: `celery -A tasks.worker worker ...`.

It builds the services (no web app, no keys file) and the Celery app that holds them.
"""

from config.logs import configure_logging
from config.settings import load_settings
from services import build_services
from tasks.celery_app import make_celery
from tasks.queue import CeleryQueue

settings = load_settings()
configure_logging(settings.log_level, settings.log_json)
services = build_services(settings, CeleryQueue())
celery_app = make_celery(settings, services)
