# chatapp: gunicorn + gevent on Python 3.11 slim, as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    CHATAPP_INSTANCE_PATH=/data

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY config.py wsgi.py gunicorn.conf.py ./
COPY chatapp ./chatapp
COPY migrations ./migrations

RUN useradd --system --uid 10001 --home-dir /app chatapp \
    && mkdir -p /data && chown chatapp /data
USER chatapp
VOLUME ["/data"]
EXPOSE 8000

# Migrations first (idempotent), then the server; exec so gunicorn gets SIGTERM for a graceful stop.
CMD ["sh", "-c", "flask --app wsgi db upgrade && exec gunicorn -c gunicorn.conf.py wsgi:app"]
