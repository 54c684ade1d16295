import NIOCore
import NIOPosix

/// The control protocol of a link (SPEC.md §12.8): one command per line, one answer line each.
///
/// `cut`, `heal`, `reset` (close every relayed connection), `delay MS`, `rate MBIT` (0 lifts the
/// cap) answer `ok`; `stats` answers the `LinkStats` JSON; anything else answers `error: …`.
public enum LinkCommand {
    public static func execute(_ line: String, on link: LinkEmulator) -> String {
        let words = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let verb = words.first else { return "error: empty command" }
        func number() -> Int? { words.count == 2 ? Int(words[1]).flatMap { $0 >= 0 ? $0 : nil } : nil }
        switch verb {
        case "cut":
            link.cut()
        case "heal":
            link.heal()
        case "reset":
            link.resetConnections()
        case "stats":
            return link.currentStats.json
        case "delay":
            guard let ms = number(), ms <= 60_000 else { return "error: delay wants milliseconds, 0...60000" }
            var settings = link.currentSettings
            settings.delayMs = ms
            link.update(settings)
        case "rate":
            guard let mbit = number() else { return "error: rate wants megabits per second (0: no cap)" }
            var settings = link.currentSettings
            settings.rateBytesPerSecond = mbit == 0 ? nil : mbit * 125_000
            link.update(settings)
        default:
            return "error: unknown command '\(verb)' (cut, heal, reset, delay MS, rate MBIT, stats)"
        }
        return "ok"
    }
}

extension LinkEmulator {
    /// Serves the control protocol on a Unix socket at `path` (a stale file there is replaced).
    public func listenControl(path: String) throws {
        let link = self
        _ = try ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ControlHandler(link: link))
                }
            }
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
            .wait()
    }
}

/// Splits the control connection into lines and answers each.
final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    static let maxLineBytes = 1024

    let link: LinkEmulator
    private var pending: [UInt8] = []

    init(link: LinkEmulator) {
        self.link = link
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        pending += buffer.readBytes(length: buffer.readableBytes) ?? []
        while let newline = pending.firstIndex(of: 0x0A) {
            let line = String(decoding: pending[..<newline], as: UTF8.self).trimmingCharacters(in: " \r\t")
            pending.removeSubrange(...newline)
            let answer = LinkCommand.execute(line, on: link) + "\n"
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(string: answer)), promise: nil)
        }
        if pending.count > Self.maxLineBytes {
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(string: "error: line too long\n")),
                                  promise: nil)
            context.close(promise: nil)
        }
    }
}

extension String {
    fileprivate func trimmingCharacters(in characters: String) -> String {
        var slice = Substring(self)
        while let first = slice.first, characters.contains(first) { slice.removeFirst() }
        while let last = slice.last, characters.contains(last) { slice.removeLast() }
        return String(slice)
    }
}
