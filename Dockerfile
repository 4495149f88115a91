# Neuron Monitor as a container: a Hugging Face Space (Docker SDK, app_port 8501) or any host.
# The steps are the README's own commands ("Hosting"). Build the bundle first, next to this file:
#   .venv/bin/python -m cache bundle --out demo.duckdb
# then: docker build -t neuron-monitor . && docker run -p 8501:8501 neuron-monitor
# Not built or run on the development machines (no container engine runs there); see the README.
FROM python:3.11-slim

RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make && rm -rf /var/lib/apt/lists/*
RUN useradd -m -u 1000 user
USER user
WORKDIR /home/user/app
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MONITOR_HOSTED=1 MONITOR_DB=/home/user/app/demo.duckdb

COPY --chown=user . .
# make setup: the virtual environment and the converted embedded model (the README's quick start)
RUN make setup PYTHON=python3

EXPOSE 8501
CMD [".venv/bin/python", "-m", "streamlit", "run", "dashboard/app.py", "--server.port", "8501", "--server.address", "0.0.0.0", "--server.headless", "true"]
