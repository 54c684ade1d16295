#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// Where a hub listens: a TCP host and port, or a Unix socket path.
///
/// Written as `weft://HOST:PORT` (IPv6 hosts in brackets: `weft://[::1]:7000`) or
/// `unix:/absolute/path.sock`; `description` gives back that form.
public enum HubAddress: Equatable, Hashable, Sendable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public var description: String {
        switch self {
        case let .tcp(host, port): "weft://\(host.contains(":") ? "[\(host)]" : host):\(port)"
        case let .unix(path): "unix:\(path)"
        }
    }

    /// How error messages name the hub: `HOST:PORT` or the socket path.
    public var displayName: String {
        switch self {
        case let .tcp(host, port): "\(host.contains(":") ? "[\(host)]" : host):\(port)"
        case let .unix(path): path
        }
    }

    /// Parses `weft://HOST:PORT` or `unix:/PATH`. Throws EINVAL with a message naming the problem.
    public static func parse(_ text: String) throws -> HubAddress {
        let usage = "expected weft://HOST:PORT or unix:/PATH"
        func bad(_ reason: String) -> WeftError {
            WeftError(EINVAL, "bad hub address '\(text)': \(reason) (\(usage))")
        }
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            guard path.hasPrefix("/") else { throw bad("the socket path must be absolute") }
            guard path.utf8.count < 108 else { throw bad("the socket path is longer than 107 bytes") }
            return .unix(path: path)
        }
        guard text.hasPrefix("weft://") else { throw bad("unknown scheme") }
        var rest = Substring(text.dropFirst("weft://".count))
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.isEmpty else { throw bad("missing host") }

        let host: Substring
        let portText: Substring
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw bad("unterminated '[' in IPv6 host") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let afterHost = rest[rest.index(after: close)...]
            guard afterHost.hasPrefix(":") else { throw bad("missing :PORT") }
            portText = afterHost.dropFirst()
        } else {
            guard let colon = rest.lastIndex(of: ":") else { throw bad("missing :PORT") }
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
            guard !host.contains(":") else { throw bad("an IPv6 host must be in brackets") }
        }
        guard !host.isEmpty else { throw bad("missing host") }
        guard !host.contains(where: { $0 == "/" || $0 == "@" || $0 == "?" || $0 == "#" || $0.isWhitespace }) else {
            throw bad("invalid character in host '\(host)'")
        }
        guard !portText.isEmpty else { throw bad("missing port after ':'") }
        guard portText.allSatisfy({ $0.isASCII && $0.isNumber }), portText.count <= 5,
              let port = Int(portText), (1...65535).contains(port) else {
            throw bad("port '\(portText)' is not a number in 1...65535")
        }
        return .tcp(host: String(host), port: port)
    }
}
