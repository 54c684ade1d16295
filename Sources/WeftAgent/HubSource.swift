import Foundation
import Logging
import WeftHub
import WeftMeta
import WeftNet
import WeftProto

/// Where a command finds its hub: a hub directory (embedded) or a running weftd.
public enum HubSource: CustomStringConvertible {
    case directory(String)
    case remote(HubAddress)

    public static func parse(_ text: String) throws -> HubSource {
        if text.hasPrefix("weft://") { return .remote(try HubAddress.parse(text)) }
        if text.contains("://") { throw WeftError(EINVAL, "unknown source '\(text)': use a hub directory or weft://HOST:PORT") }
        let path = URL(fileURLWithPath: text).standardizedFileURL.path
        return .directory(path)
    }

    public var description: String {
        switch self {
        case .directory(let path): return path
        case .remote(let address): return "\(address)"
        }
    }
}

/// A hub reached for one command, and how to let go of it.
public struct OpenedHub {
    public let api: HubAPI
    /// The in-process hub, when this process owns the directory.
    public let local: Hub?
    let remote: RemoteHub?

    public func close() {
        if let local { try? local.close() }
        remote?.close()
    }
}

public enum HubOpener {
    /// Longest wait for a hub that does not answer.
    public static let connectTimeoutMs = 5_000

    /// Opens `source` for an administrative command: a running process that serves a hub
    /// directory is reached through its socket; otherwise the directory is opened in-process.
    public static func open(_ source: HubSource, durability: DurabilityMode = .strict, recover: Bool,
                            logger: Logger) throws -> OpenedHub {
        switch source {
        case .remote(let address):
            let remote = RemoteHub(address: address, connectTimeoutMs: connectTimeoutMs, logger: logger)
            return OpenedHub(api: remote, local: nil, remote: remote)
        case .directory(let path):
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw WeftError(ENOENT, "hub directory \(path) does not exist")
            }
            if EmbeddedSocket.isServed(path) {
                let remote = RemoteHub(address: .unix(path: EmbeddedSocket.path(path)), connectTimeoutMs: connectTimeoutMs,
                                       logger: logger)
                return OpenedHub(api: remote, local: nil, remote: remote)
            }
            let hub = try Hub(directory: path, durability: durability, logger: logger)
            if recover { try hub.recover() }
            return OpenedHub(api: hub, local: hub, remote: nil)
        }
    }
}
