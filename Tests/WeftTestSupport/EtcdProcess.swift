import Foundation

/// A throw-away etcd server on loopback ports, with its data in a temporary directory. Started
/// by the test that needs it and stopped (killed, directory removed) by `stop()` or deinit.
public final class EtcdProcess {
    public let endpoint: String
    public let directory: String
    private let process: Process

    /// Starts `etcd` (Debian's etcd-server; `Tests/run-all` installs it) and waits until it answers.
    public init(timeoutSeconds: Double = 20) throws {
        guard let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw TestEnvironmentError("etcd is not installed: apt-get install etcd-server (Tests/run-all does)")
        }
        directory = NSTemporaryDirectory() + "weft-etcd-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let clientPort = try freePort()
        let peerPort = try freePort()
        endpoint = "http://127.0.0.1:\(clientPort)"
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "--name", "test", "--data-dir", directory + "/data",
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-cluster", "test=http://127.0.0.1:\(peerPort)",
            "--log-level", "error",
        ]
        let log = FileHandle(forWritingAtPath: directory + "/etcd.log") ?? {
            _ = FileManager.default.createFile(atPath: directory + "/etcd.log", contents: nil)
            return FileHandle(forWritingAtPath: directory + "/etcd.log")!
        }()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        let deadline = Date(timeIntervalSinceNow: timeoutSeconds)
        while Date() < deadline {
            if !process.isRunning { break }
            if isHealthy(port: clientPort) { return }
            Thread.sleep(forTimeInterval: 0.1)
        }
        stop()
        let output = (try? String(contentsOfFile: directory + "/etcd.log", encoding: .utf8)) ?? ""
        throw TestEnvironmentError("etcd did not start within \(timeoutSeconds) s:\n\(output)")
    }

    public func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }
}

public struct TestEnvironmentError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A TCP port that was free a moment ago (bound to port 0, then released).
public func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Int32 in
            guard bind(fd, pointer, length) == 0 else { return -1 }
            return getsockname(fd, pointer, &length)
        }
    }
    guard bound == 0 else { throw TestEnvironmentError("cannot find a free port: \(String(cString: strerror(errno)))") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// GET /health answers {"health":"true"} once etcd serves requests.
private func isHealthy(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    } == 0
    guard connected else { return false }
    var timeout = timeval(tv_sec: 1, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let request = Array("GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
    guard write(fd, request, request.count) == request.count else { return false }
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1024)
    while true {
        let n = read(fd, &chunk, chunk.count)
        if n <= 0 { break }
        response += chunk[0..<n]
    }
    return String(decoding: response, as: UTF8.self).contains("\"health\":\"true\"")
}
