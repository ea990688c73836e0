# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_testflinger_agent_global_optspecs
    string join \n c/config= token-file= p/metrics-port= h/help V/version
end

function __fish_testflinger_agent_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_testflinger_agent_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_testflinger_agent_using_subcommand
    set -l cmd (__fish_testflinger_agent_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -s c -l config -d 'The agent config file (YAML)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -l token-file -d 'The refresh-token file written by the deployment tooling' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -s p -l metrics-port -l metrics_port -d 'Serve Prometheus metrics (`/metrics`) and `/health` on this port; overrides the config key metrics_endpoint_port. `--metrics_port` is the Python agent\'s spelling' -r
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -s V -l version -d 'Print version'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "run-job" -d 'Run one job locally, with no server: output to the terminal, files in the run dir'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "check-config" -d 'Validate a config file, print the effective config (defaults filled in), and check what the daemon would need at start-up'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "healthcheck" -d 'Run the device health check (config key healthcheck_command) once, in the foreground, as the daemon runs it: its output goes to `<logging_basedir>/healthchecks/`, a summary to standard output. It takes the agent\'s lock, so it never runs beside the daemon of the same agent_id (whose own checks run inside it: send it SIGUSR2 for one). Exits 0 when the check passes, 1 when it fails or times out, 2 when the config has no health check, cannot be used, or the daemon holds the lock'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "diagram" -d 'Render the state diagrams from the code'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "explain" -d 'Show the path one job took through the lifecycle, from its journal\'s trail (or one health check, like a phase)'
complete -c testflinger-agent -n "__fish_testflinger_agent_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand run-job" -s c -l config -d 'The agent config file (YAML)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand run-job" -s h -l help -d 'Print help'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -s c -l config -d 'The agent config file (YAML)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -l token-file -d 'The refresh-token file the daemon is given (the daemon\'s default when absent)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -s p -l metrics-port -l metrics_port -d 'The metrics port the daemon is given (else the config key metrics_endpoint_port)' -r
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -l server -d 'Also contact the server: it answers, the refresh token is exchanged for an access token, and the agent\'s record can be read. Nothing else is posted'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -l reference-table -d 'Print the Markdown reference table of every config key instead'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand check-config" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand healthcheck" -s c -l config -d 'The agent config file (YAML)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand healthcheck" -s h -l help -d 'Print help'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand diagram" -l format -r -f -a "mermaid\t''
dot\t''
table\t'The transition table in Markdown: one row per (from, event, to)'"
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand diagram" -l machine -d 'Which state machine' -r
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand diagram" -l write -d 'Write every machine in every format into this directory instead' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand diagram" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand explain" -s c -l config -d 'The agent config whose `logging_basedir` holds the kept trails: when PATH has no trail, they are listed from there (else from the default `logging_basedir`)' -r -F
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand explain" -l format -d '`table` lists each transition; `mermaid` and `dot` draw the lifecycle with this job\'s edges highlighted and numbered, the others faded' -r -f -a "table\t''
mermaid\t''
dot\t''"
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand explain" -s h -l help -d 'Print help'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "run-job" -d 'Run one job locally, with no server: output to the terminal, files in the run dir'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "check-config" -d 'Validate a config file, print the effective config (defaults filled in), and check what the daemon would need at start-up'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "healthcheck" -d 'Run the device health check (config key healthcheck_command) once, in the foreground, as the daemon runs it: its output goes to `<logging_basedir>/healthchecks/`, a summary to standard output. It takes the agent\'s lock, so it never runs beside the daemon of the same agent_id (whose own checks run inside it: send it SIGUSR2 for one). Exits 0 when the check passes, 1 when it fails or times out, 2 when the config has no health check, cannot be used, or the daemon holds the lock'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "diagram" -d 'Render the state diagrams from the code'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "explain" -d 'Show the path one job took through the lifecycle, from its journal\'s trail (or one health check, like a phase)'
complete -c testflinger-agent -n "__fish_testflinger_agent_using_subcommand help; and not __fish_seen_subcommand_from run-job check-config healthcheck diagram explain help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
