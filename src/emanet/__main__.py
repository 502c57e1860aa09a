from emanet.cli.main import run

run()
