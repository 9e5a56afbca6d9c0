"""The job domain: batch files, single batch completions and eval runs, with no Flask and no
Celery. `store` is the only code that knows the jobs' Redis keys; `files` holds uploaded and
written files; `kinds` says what each kind of job does with its lines; `dispatch` runs lines
against engines (threads, admission leases, HTTP); `lifecycle` creates, validates, finalizes,
cancels and sweeps jobs. Celery task functions (`tasks/`) and the web API (`webapp/`) call in.
"""
