# OneCDP developer commands. `make up` and `make test` are the README's two commands.
.PHONY: up test down status logs protos

up:      ## install everything, start Cassandra and the four services, load the CDNOW demo data
	bash deploy/bootstrap.sh
	.venv/bin/python -m deploy.stack up
	.venv/bin/python -m deploy.demo load

test:    ## install everything, then run the whole suite (what CI runs)
	bash deploy/bootstrap.sh
	bash deploy/check.sh

down:    ## stop the four services, and Cassandra if `make up` started it
	.venv/bin/python -m deploy.stack down

status:  ## where everything runs
	.venv/bin/python -m deploy.stack status

protos:  ## regenerate protos/gen/python from protos/onecdp
	.venv/bin/python protos/generate.py
