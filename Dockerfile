# One image for every stage; the command picks the stage: python -m services.<stage>
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ORCH_HEALTH_FILE=/tmp/orchestrator.alive

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY shared ./shared
COPY services ./services
RUN pip install '.[fast]' \
    && useradd --system --uid 10001 orchestrator
USER orchestrator

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["orchestrator", "health"]

CMD ["orchestrator", "--help"]
