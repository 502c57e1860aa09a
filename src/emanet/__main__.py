from emanet.cli import run

run()
