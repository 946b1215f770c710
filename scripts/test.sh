#!/usr/bin/env bash
# Run the test suite on this machine: install the project, make sure RabbitMQ and
# Redis answer (starting local ones that are installed but stopped), check that the
# gRPC stubs are current, then run pytest. Under CI (CI=true) a missing service is a
# failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 6379 && command -v redis-server >/dev/null; then
  echo "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/fedq-test-redis.log
fi
if ! up 5672 && command -v rabbitmq-server >/dev/null; then
  echo "starting rabbitmq-server"
  rabbitmq-server -detached
fi
for _ in $(seq 1 60); do
  if up 6379 && up 5672; then break; fi
  sleep 1
done
up 6379 || echo "warning: Redis is not answering on 127.0.0.1:6379"
up 5672 || echo "warning: RabbitMQ is not answering on 127.0.0.1:5672"

if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium for the dashboard test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/tmp/fedq-chromium-install.log 2>&1 || echo "warning: chromium could not be installed"
fi

python3 -m proto.generate --check
export FEDQ_TEST_DATA="${FEDQ_TEST_DATA:-$(cd .. && pwd)/shared/data}"
exec python3 -m pytest "$@"
