from aidc_server.server import main

if __name__ == "__main__":
    raise SystemExit(main())
