# Quantization Playground for a team: one container, one Streamlit server process.
#   docker build -t quantization-playground .
#   docker run -p 8501:8501 -v $PWD/secrets.toml:/run/secrets/qp/secrets.toml:ro \
#       quantization-playground
# Secrets (sign-in, the allow-list) are mounted at run time, never baked into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # a hosted app: no dataset downloads by viewers, and no app without sign-in
    QP_ALLOW_DATA_DOWNLOAD=0 \
    QP_REQUIRE_SIGN_IN=1 \
    QCORE_DATA_DIR=/app/data

WORKDIR /app

# CPU-only PyTorch first (the default wheels bring CUDA libraries), then the pinned rest.
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "$(grep '^torch==' requirements.txt)" "$(grep '^torchvision==' requirements.txt)" \
 && pip install -r requirements.txt

RUN useradd --create-home --uid 10001 playground
COPY --chown=playground:playground . .
USER playground

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request as u, sys; sys.exit(u.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).read() != b'ok')"

CMD ["streamlit", "run", "app.py", "--server.address", "0.0.0.0", "--server.port", "8501", \
     "--secrets.files", "/run/secrets/qp/secrets.toml"]
