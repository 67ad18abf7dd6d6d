# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with its dependencies, then copy only the virtual
# environment into a slim runtime image that runs as a non-root user and works
# with a read-only root filesystem (writes go to /tmp, an emptyDir in deploy/).
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY shadowctl ./shadowctl
RUN pip install --no-cache-dir .

FROM python:3.11-slim
RUN groupadd --gid 10001 shadowctl && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin shadowctl
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["shadowctl"]
CMD ["run"]
