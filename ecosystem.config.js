// PM2 7 apps for the AI streaming gateway: the API (PORT, 3301) and the admin page (ADMIN_PORT,
// 3300), both `python -m service` from the project's venv, behind nginx.conf or the Caddyfile.
// Must match: the proxies' upstream ports; kill_timeout above SHUTDOWN_DRAIN_S (PM2 stops with
// SIGINT, then SIGKILLs after kill_timeout: its default 1.6 s would kill streams mid-drain).
// Settings come from the environment of whoever runs pm2 (deploy/deploy.sh loads an env file);
// this file also reads VENV_PYTHON (default ./.venv/bin/python), LOG_DIR (./logs), MAX_MEMORY (1G).
//
//   pm2 startOrReload ecosystem.config.js --update-env     (or, in the foreground: pm2-runtime start)
//
// More than one API instance: API_INSTANCES=N runs N processes on PORT, PORT+1, ... (add each to
// the proxy's upstream block). Python apps cannot use PM2's cluster mode (Node only), and N
// processes on one port need SO_REUSEPORT, which the service does not set. Each instance keeps its
// own rate-limit state unless REDIS_URL is set, so a client would get N times its limits: with
// API_INSTANCES above 1, REDIS_URL is required.
const path = require("path");

const root = __dirname;
const python = process.env.VENV_PYTHON || path.join(root, ".venv", "bin", "python");
const logs = process.env.LOG_DIR || path.join(root, "logs");
const env = process.env;

const drainS = Number(env.SHUTDOWN_DRAIN_S || 25);
const apiPort = Number(env.PORT || 3301);
const instances = Number(env.API_INSTANCES || 1);
if (!Number.isInteger(instances) || instances < 1) {
  throw new Error(`API_INSTANCES must be a whole number from 1, not ${env.API_INSTANCES}`);
}
if (instances > 1 && !env.REDIS_URL) {
  throw new Error("API_INSTANCES above 1 needs REDIS_URL: the instances must share one rate-limit budget");
}

// What every app shares; secrets (OPENAI_API_KEY, API_KEYS, REDIS_URL) come from the environment.
const common = {
  script: python,
  interpreter: "none",       // the venv's python is the program itself
  exec_mode: "fork",         // cluster mode is Node-only
  cwd: root,
  autorestart: true,
  exp_backoff_restart_delay: 200,  // 200 ms, x1.5 per crash in a row, reset once it stays up
  max_memory_restart: env.MAX_MEMORY || "1G",  // checked every 30 s by PM2
  kill_timeout: (drainS + 10) * 1000,  // drain, plus aiohttp's own margin (shutdown_timeout)
  merge_logs: true,
  time: true,
};

const apiEnv = (port) => ({
  PYTHONUNBUFFERED: "1",     // with interpreter "none", logs stall in a buffer without it
  HOST: env.HOST || "127.0.0.1",
  PORT: String(port),
  ADMIN_PORT: String(env.ADMIN_PORT || 3300),
  HEARTBEAT_INTERVAL_S: env.HEARTBEAT_INTERVAL_S || "15",  // below the proxies' read timeout
  SHUTDOWN_DRAIN_S: String(drainS),
  LOG_FORMAT: env.LOG_FORMAT || "json",
  LOG_LEVEL: env.LOG_LEVEL || "info",
  CORS_ORIGINS: env.CORS_ORIGINS || "https://admin.example.com",
  TRUSTED_PROXIES: env.TRUSTED_PROXIES || "127.0.0.1,::1",  // the proxy in front
});

const apis = Array.from({ length: instances }, (_, i) => ({
  ...common,
  name: instances === 1 ? "ai-stream-api" : `ai-stream-api-${i}`,
  args: ["-m", "service", "api"],
  env: apiEnv(apiPort + i),
  out_file: path.join(logs, "api.out.log"),
  error_file: path.join(logs, "api.err.log"),
}));

module.exports = {
  apps: [
    ...apis,
    {
      ...common,
      name: "ai-stream-admin",
      args: ["-m", "service", "admin"],
      env: apiEnv(apiPort),
      max_memory_restart: "300M",
      kill_timeout: 10000,   // the admin page holds no streams; aiohttp gives it 5 s
      out_file: path.join(logs, "admin.out.log"),
      error_file: path.join(logs, "admin.err.log"),
    },
  ],
};
