import ArgumentParser
import Dispatch
import Foundation
import Logging
import WeftLink

@main
struct WeftLinkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft-link",
        abstract: "User-space WAN link emulator: a TCP relay with delay, bandwidth cap, counters, cut and heal.",
        discussion: """
            Example: weft-link serve --listen 127.0.0.1:7101 --to 127.0.0.1:7002 --delay-ms 15 --control /tmp/l.sock
                     weft-link control /tmp/l.sock cut
            """,
        subcommands: [Serve.self, Control.self],
        defaultSubcommand: Serve.self)
}

/// HOST:PORT, with optional brackets around an IPv6 host.
func parseEndpoint(_ text: String, option: String) throws -> (String, Int) {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
          (0...65535).contains(port), colon != text.startIndex else {
        throw ValidationError("\(option) must be HOST:PORT, got '\(text)'")
    }
    return (String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port)
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Relay connections from --listen to --to until SIGTERM or SIGINT.")

    @Option(help: "Address to accept connections on, HOST:PORT (port 0 picks one).") var listen: String
    @Option(help: "Target address, HOST:PORT.") var to: String
    @Option(help: "One-way delay added in each direction, milliseconds.") var delayMs: Int = 0
    @Option(help: "Bandwidth cap of each direction, megabits per second (0: none).") var rateMbit: Int = 0
    @Option(help: "Unix socket for control commands (cut, heal, reset, delay MS, rate MBIT, stats).")
    var control: String?

    func validate() throws {
        guard (0...60_000).contains(delayMs) else { throw ValidationError("--delay-ms must be 0...60000") }
        guard rateMbit >= 0 else { throw ValidationError("--rate-mbit must be 0 or more") }
        _ = try parseEndpoint(listen, option: "--listen")
        _ = try parseEndpoint(to, option: "--to")
    }

    func run() throws {
        var logger = Logger(label: "weft-link")
        logger.logLevel = .notice
        let (listenHost, listenPort) = try parseEndpoint(listen, option: "--listen")
        let (targetHost, targetPort) = try parseEndpoint(to, option: "--to")
        let settings = LinkSettings(delayMs: delayMs, rateBytesPerSecond: rateMbit == 0 ? nil : rateMbit * 125_000)
        let link = LinkEmulator(target: targetHost, port: targetPort, settings: settings, logger: logger)
        let port: Int
        do {
            port = try link.listen(host: listenHost, port: listenPort)
            if let control { try link.listenControl(path: control) }
        } catch {
            link.shutdown()
            throw ValidationError("cannot listen: \(error)")
        }
        print("weft-link listening on \(listenHost):\(port) -> \(targetHost):\(targetPort)")
        fflush(stdout)
        let stop = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for signalNumber in [SIGTERM, SIGINT] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { stop.signal() }
            source.resume()
            sources.append(source)
        }
        stop.wait()
        link.shutdown()
        if let control { unlink(control) }
    }
}

struct Control: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send one command to a running link's control socket and print the answer.")

    @Argument(help: "The link's control socket.") var socket: String
    @Argument(parsing: .remaining, help: "cut | heal | reset | delay MS | rate MBIT | stats") var command: [String]

    func run() throws {
        guard !command.isEmpty else { throw ValidationError("give a command: cut, heal, reset, delay MS, rate MBIT, stats") }
        let fd = Foundation.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socket.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw ValidationError("socket path too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw ValidationError("cannot reach link control socket \(socket): \(String(cString: strerror(errno)))")
        }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let line = Array((command.joined(separator: " ") + "\n").utf8)
        guard write(fd, line, line.count) == line.count else { throw ValidationError("write to \(socket) failed") }
        var answer: [UInt8] = []
        var byte: UInt8 = 0
        while read(fd, &byte, 1) == 1 {
            if byte == 0x0A { break }
            answer.append(byte)
        }
        let text = String(decoding: answer, as: UTF8.self)
        print(text)
        if text.hasPrefix("error") || answer.isEmpty { throw ExitCode.failure }
    }
}
