import ArgumentParser
import Dispatch
import Foundation
import WeftAgent
import WeftHub
import WeftMeta
import WeftNet
import WeftProto

@main
struct WeftDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weftd",
        abstract: "Weft hub daemon: serves a hub's metadata and chunk services to agents.",
        subcommands: [Serve.self])
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the hub in DIR (made by `weft format`) on HOST:PORT until SIGTERM or SIGINT.",
        discussion: "Example: weftd serve /srv/weft/hub --listen 0.0.0.0:7070; agents mount weft://HOST:7070.")

    @Argument(help: "Hub directory.") var directory: String
    @Option(help: "Address to listen on, HOST:PORT.") var listen: String
    @Option(help: "Metadata durability: strict (fsync before reply) or periodic (fsync every second).")
    var durability: String = "strict"

    func run() throws {
        guard let mode = DurabilityMode(rawValue: durability) else {
            throw ValidationError("--durability must be strict or periodic")
        }
        guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
              (0...65535).contains(port) else {
            throw ValidationError("--listen must be HOST:PORT, got '\(listen)'")
        }
        let host = String(listen[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        Mounter.boundMallocRetention()
        let logger = WeftLogging.logger("weftd")
        let path = URL(fileURLWithPath: directory).standardizedFileURL.path
        if EmbeddedSocket.isServed(path) { throw WeftError(EBUSY, "\(path) is already served by another process") }
        let hub = try Hub(directory: path, durability: mode, logger: logger)
        try hub.recover()
        let server = HubServer(hub: hub, logger: logger)
        let bound: Int
        do {
            bound = try server.listen(host: host, port: port)
            try server.listen(unixSocketPath: EmbeddedSocket.path(path))
        } catch {
            server.shutdown()
            try? hub.close()
            throw WeftError(EADDRINUSE, "cannot listen on \(listen): \(error)")
        }
        print("weftd serving \(path) on \(host):\(bound)")
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
        logger.info("shutting down")
        server.shutdown()
        try hub.close()
    }
}
