"""Celery's static configuration: queues, routes, delivery guarantees and the beat schedule.

Values that come from the environment (the broker URL, the tick interval) are applied on top by
`tasks.celery_app.celery_init_app` from the settings, so this module reads no environment.
"""

from kombu import Queue

task_queues = (
    Queue("control"),
    Queue("downloads"),
    Queue("batch"),
)
task_default_queue = "control"
task_routes = {
    "control.*": {"queue": "control"},
    "autoscale.*": {"queue": "control"},
    "downloads.*": {"queue": "downloads"},
    "batch.sweep": {"queue": "control"},
    "batch.*": {"queue": "batch"},
}

# Nothing lost: a task is acknowledged once done, and given back if its worker dies.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_transport_options = {
    # Replaced by CELERY_VISIBILITY_TIMEOUT from the settings.
    "visibility_timeout": 900,
    "queue_order_strategy": "priority",
    "priority_steps": list(range(10)),
    "sep": ":",
}
broker_connection_retry_on_startup = True

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
result_expires = 24 * 3600
task_ignore_result = True
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False

beat_schedule = {
    "autoscale-tick": {
        "task": "autoscale.tick",
        "schedule": 5.0,
        "options": {"queue": "control", "expires": 5.0},
    },
    "batch-sweep": {
        "task": "batch.sweep",
        "schedule": 15.0,
        "options": {"queue": "control", "expires": 15.0},
    },
}
