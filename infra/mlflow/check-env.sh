#!/bin/sh
# Refuses to start the MLflow stack while any value still holds a `change-me` placeholder of
# .env.example: docker compose runs this first (service check-env) and every other service waits
# for it to succeed. Names each offending variable, never its value.
bad=$(env | grep -i 'change-me' | cut -d= -f1 | sort)
if [ -n "$bad" ]; then
  for name in $bad; do
    echo "infra/mlflow/.env: $name still holds the change-me placeholder of .env.example; expected a real value" >&2
  done
  exit 1
fi
echo "infra/mlflow/.env: no change-me placeholder left"
