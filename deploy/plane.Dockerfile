# The plane (`controlplane up`) and its Streamlit app, for compose.yaml (built from the repository root; only the
# files plane.Dockerfile.dockerignore lets through are sent). Specs, rules and the app are mounted, not copied.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
COPY collectors ./collectors
RUN pip install . \
 && useradd --create-home --uid 10001 controlplane \
 && mkdir -p /data && chown controlplane /data
USER controlplane

EXPOSE 8000 8080 4317 4318 8501
CMD ["controlplane", "up"]
